"""SMT artifacts of one run on the same test slides (float against INT8, or a KD teacher against its
student: ``--artifacts teacher_fp32 student_fp32``): quality, agreement, and time per slide.

    python scripts/bench_smt_int8.py --smt-run <model=smt run> --out <dir> \
        [--artifacts smt_fp32 smt_int8_dynamic smt_int8_qat]

Every named artifact of the run walks every test slide the way ``bench_smt.py`` times SMT (slide reopened,
tissue box found afresh, 1 + K + K^2 regions read from the file), with the artifacts in a rotating order per
slide (this machine is shared and noisy). Reports per artifact: slide accuracy and AUROC, the share of slides
called as the first (float) artifact calls them, and the medians over slides of model seconds, whole-walk
seconds and their ratios to the first artifact. Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_smt import binary_quality, datamodule_of, rotate, run_smt  # noqa: E402

from patholite.artifacts.resolve import resolve_artifact
from patholite.io import write_json  # noqa: E402
from patholite.slides.smt_inference import load_smt_model  # noqa: E402

log = logging.getLogger("bench_smt_int8")


def measure(dm, models: dict[str, tuple], mpp) -> list[dict[str, Any]]:
    dataset = dm.datasets["test"]
    negative = dm.class_names.index(dm.negative_class)
    names, rows = tuple(models), []
    for n, i in enumerate(dataset.slides):
        path = Path(dm.slide_paths[int(i)])
        row: dict[str, Any] = {"slide": path.name, "label": int(int(dataset.labels[n]) != negative)}
        for name in rotate(names, n):
            net, meta = models[name]
            tissue_px = meta["model"]["smt"].get("tissue_px") or 2048
            out = run_smt(net, meta, path, mpp, tissue_side=tissue_px)
            row[name] = {k: out[k] for k in ("positive", "wall_s", "tissue_s", "read_s", "model_s", "reads")}
        log.info("%s: %s", path.name, ", ".join(f"{k} {row[k]['model_s']:.3f}s" for k in names))
        rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    labels, first = [r["label"] for r in rows], names[0]

    def med(fn) -> float:
        return float(statistics.median(fn(r) for r in rows))

    out = {}
    for name in names:
        scores = [r[name]["positive"] for r in rows]
        out[name] = {
            **binary_quality(scores, labels),
            "same_call_as_" + first: float(
                sum((r[name]["positive"] >= 0.5) == (r[first]["positive"] >= 0.5) for r in rows) / len(rows)
            ),
            "model_s": med(lambda r, m=name: r[m]["model_s"]),
            "walk_s": med(lambda r, m=name: r[m]["wall_s"] - r[m]["tissue_s"]),
            "model_speedup": med(lambda r, m=name: r[first]["model_s"] / r[m]["model_s"]),
            "walk_speedup": med(
                lambda r, m=name: (
                    (r[first]["wall_s"] - r[first]["tissue_s"]) / (r[m]["wall_s"] - r[m]["tissue_s"])
                )
            ),
        }
    return out


def markdown(summary: dict[str, Any], n: int) -> str:
    first = next(iter(summary))
    lines = [
        f"# Float and INT8 SMT on {n} test slides", "",
        f"| artifact | accuracy | AUROC | same call as {first} | model s | walk s | model speed-up | "
        "walk speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, s in summary.items():
        auroc = "-" if s["auroc"] is None else f"{s['auroc']:.3f}"
        lines.append(
            f"| {name} | {s['accuracy']:.3f} | {auroc} | {s['same_call_as_' + first]:.3f} | "
            f"{s['model_s']:.3f} | {s['walk_s']:.3f} | {s['model_speedup']:.2f}x | {s['walk_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smt-run", type=Path, required=True, help="a finished model=smt run folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--artifacts", nargs="+", default=["smt_fp32", "smt_int8_dynamic", "smt_int8_qat"],
                        help="artifact names of the run; the first is the reference")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg, dm = datamodule_of(args.smt_run)
    models = {name: load_smt_model(resolve_artifact(args.smt_run, name)) for name in args.artifacts}
    rows = measure(dm, models, cfg.dataset.reader.mpp)
    summary = summarise(rows, list(args.artifacts))
    write_json(args.out / "results.json", {"summary": summary, "slides": rows, "threads": args.threads})
    text = markdown(summary, len(rows))
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
