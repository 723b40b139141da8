"""SMT artifacts of one run on the same test slides (float against INT8, or a KD teacher against its
student: ``--artifacts teacher_fp32 student_fp32``): quality, agreement, and time per slide.

    python scripts/bench_smt_int8.py --smt-run <model=smt run> --out <dir> \
        [--artifacts smt_fp32 smt_int8_dynamic smt_int8_qat]

Every named artifact of the run walks every test slide the way ``bench_smt.py`` times SMT (slide reopened,
tissue box found afresh, 1 + K + K^2 regions read from the file), with the artifacts in a rotating order per
slide (this machine is shared and noisy). Reports per artifact: slide accuracy and AUROC, the share of slides
called as the first (float) artifact calls them, and the medians over slides of model seconds, whole-walk
seconds and their ratios to the first artifact. Writes ``results.json`` and ``results.md``.

The walks live in ``patholite.slides.comparison_runs.walk_artifacts``, the summary and report in
``patholite.slides.comparison``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from patholite.artifacts.resolve import resolve_artifact
from patholite.errors import PatholiteError
from patholite.io import write_json
from patholite.pipelines.tasks import task_for
from patholite.records import read_record
from patholite.slides.comparison import artifacts_markdown, compare_artifacts
from patholite.slides.comparison_runs import split_cases, walk_artifacts
from patholite.slides.smt_inference import load_smt_model


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smt-run", type=Path, required=True, help="a finished model=smt run folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--artifacts", nargs="+", default=["smt_fp32", "smt_int8_dynamic", "smt_int8_qat"],
                        help="artifact names of the run; the first is the reference")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    cfg = OmegaConf.create(read_record(args.smt_run / "metrics.json")["config"])
    dm = task_for(cfg.model).datamodule(cfg, pin_memory=False)
    dm.setup("fit")
    models = {name: load_smt_model(resolve_artifact(args.smt_run, name)) for name in args.artifacts}
    rows = walk_artifacts(split_cases(dm, "test"), models, cfg.dataset.reader.mpp)
    summary = compare_artifacts(rows, list(args.artifacts))
    write_json(args.out / "results.json", {"summary": summary, "slides": rows, "threads": args.threads})
    text = artifacts_markdown(summary, len(rows))
    (args.out / "results.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        print(run(args))
    except PatholiteError as err:
        raise SystemExit(f"bench_smt_int8: {err}") from err


if __name__ == "__main__":
    main()
