"""SMT against full tiling on the same slides (the SMT issue's targets), with the same trained weights for
every timing.

    python scripts/bench_smt.py --smt-run <model=smt run> --tile-run <tile classifier run> --out <dir>
        [--sizes 8192 32768] [--scale-slides 2] [--mil-epochs 40]
        [--top-k 2 --top-k-max 8 --adaptive spread|margin --spread 0.05 --margin 0.25] [--tissue-min 0.2]
        [--aggregate mean|max|attention]
    (attention: a head fitted on the run's training slides, its threshold set on the validation slides,
    saved under <out>/smt_attention)

Per test slide of the SMT run's dataset, alternating which goes first (this machine is shared and noisy):
- SMT: tissue detection from scratch, the tissue box, the focusing walk reading 1 + K + K^2 regions from the
  slide file (a fresh reader); level-0-equivalent pixels read = the sum of the read boxes' areas.
- Full tiling: the slide engine over every tissue tile at the tile classifier's resolution (tissue detection
  and tiling from scratch), keeping tile probabilities and embeddings; pixels = tiles x (tile side)^2.
Quality per slide: SMT; tiling with max and mean pooling of tile scores (R3's baseline); gated-attention MIL
trained on the training slides' tile embeddings (slide labels only). Focusing precision: the share of layer-1
and layer-2 top-K regions that overlap a lesion on positive slides (synthetic truth), beside chance (the
share of all candidate patches that do). ``--sizes``: slides of other sizes (positive, same lesion settings)
timed the same way, to show how the gap grows. Writes ``results.json``, ``results.md`` and run records
under ``records/`` that ``python -m patholite.compare`` puts beside the SMT run's own.

The measuring lives in ``patholite.slides.comparison_runs``, the results, records and report in
``patholite.slides.comparison``, the statistics in ``patholite.measure.stats``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from patholite.artifacts.resolve import resolve_artifact
from patholite.errors import PatholiteError
from patholite.io import write_json
from patholite.models.smt import ADAPTIVE
from patholite.models.smt_aggregate import AGGREGATES
from patholite.pipelines.tasks import task_for
from patholite.records import read_record
from patholite.slides.comparison import (
    SMT_NAME,
    comparison_results,
    markdown,
    scaling_results,
    slide_scores,
    with_dataset_overrides,
    write_records,
)
from patholite.slides.comparison_runs import compare_slides, mil_scores, scaling_rows, split_cases, tile_bags
from patholite.slides.inference import load_classifier
from patholite.slides.smt_inference import WALK_KEYS, load_smt_model, smt_settings, with_attention_head


def datamodule(cfg: DictConfig):
    """The run's slide-level datamodule, set up (its splits)."""
    dm = task_for(cfg.model).datamodule(cfg, pin_memory=False)
    dm.setup("fit")
    return dm


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smt-run", type=Path, required=True, help="a finished model=smt run folder")
    parser.add_argument("--tile-run", type=Path, required=True, help="a tile classifier run (or artifact)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="*", default=[], help="extra slide sides for the scaling")
    parser.add_argument("--scale-slides", type=int, default=2)
    parser.add_argument("--mil-epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top-k", type=int, help="K of the walk at inference (default: as trained)")
    parser.add_argument(
        "--aggregate",
        choices=AGGREGATES,
        help="slide score (default: as trained); "
        "attention fits a head on the run's training slides (threshold on validation)",
    )
    parser.add_argument("--attention-epochs", type=int, default=40)
    parser.add_argument("--top-k-max", type=int, help="adaptive reads: the most regions per image")
    parser.add_argument("--adaptive", choices=ADAPTIVE, help="none | spread | margin (default: as trained)")
    parser.add_argument("--spread", type=float, help="adaptive=spread: focusing scores this close read")
    parser.add_argument("--margin", type=float, help="adaptive=margin: the unsure band around 0.5")
    parser.add_argument("--tissue-min", type=float, help="candidate patches need this tissue fraction")
    parser.add_argument(
        "--test-set", nargs="*", default=[], metavar="KEY=VALUE",
        help="dataset overrides for the test slides only, e.g. dataset.seed=1 "
        "dataset.slides_per_split=[2,2,24]: fresh slides to confirm a setting chosen on the run's own test "
        "slides (MIL still trains on the run's)",
    )  # fmt: skip
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    cfg = OmegaConf.create(read_record(args.smt_run / "metrics.json")["config"])
    test_cfg = with_dataset_overrides(cfg, args.test_set) if args.test_set else None  # fails before any work
    dm = datamodule(cfg)
    mpp = cfg.dataset.reader.mpp
    smt = load_smt_model(resolve_artifact(args.smt_run, SMT_NAME))
    walk = {key: getattr(args, key) for key in WALK_KEYS}  # the slide CLI's smt.* too
    smt_settings(*smt, args.smt_run, {**walk, "aggregate": None})  # a bad knob fails before any slide
    for key, value in walk.items():
        if value is not None and key != "aggregate":
            smt[1]["model"]["smt"][key] = value
    if args.aggregate == "attention" and getattr(smt[0], "aggregator", None) is None:
        pairs = {s: [(c.path, c.label) for c in split_cases(dm, s)] for s in ("train", "val")}
        smt = with_attention_head(*smt, pairs["train"], pairs["val"], args.out / "smt_attention", mpp,
                                  args.attention_epochs)  # fmt: skip
    if args.aggregate is not None:
        smt[1]["model"]["smt"]["aggregate"] = args.aggregate
    smt_settings(*smt, args.smt_run)
    tile = load_classifier(resolve_artifact(args.tile_run))
    test = compare_slides(split_cases(datamodule(test_cfg) if test_cfg else dm, "test"), smt, tile, mpp)
    scores = slide_scores(test)
    if args.mil_epochs > 0:  # 0: no MIL (it tiles every training slide again)
        train = split_cases(dm, "train")
        bags = tile_bags(train, tile, mpp, cache_dir=args.out / "cache")
        meta = {"class_names": list(dm.class_names), "tile_artifact": tile[1]}
        scores["mil_gated"] = mil_scores(
            bags, [c.label for c in train], test, args.mil_epochs, args.out, meta
        )
    results = comparison_results(test, scores, smt[1], tile[1], cfg.dataset.get("width"))
    if args.sizes:
        rows = scaling_rows(
            cfg.dataset, smt, tile, args.sizes, args.scale_slides, mpp, args.out / "scaling_slides"
        )
        results.update(scaling_results(rows, args.sizes))
    write_json(args.out / "results.json", results)
    text = markdown(results)
    (args.out / "results.md").write_text(text)
    write_records(args.out, cfg, results["quality"], test, walk)
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        print(run(args))
    except PatholiteError as err:
        raise SystemExit(f"bench_smt: {err}") from err


if __name__ == "__main__":
    main()
