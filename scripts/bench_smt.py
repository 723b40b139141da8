"""SMT against full tiling on the same slides (the SMT issue's targets), with the same trained weights for
every timing.

    python scripts/bench_smt.py --smt-run <model=smt run> --tile-run <tile classifier run> --out <dir>
        [--sizes 8192 32768] [--scale-slides 2] [--mil-epochs 40]
        [--top-k 2 4 --aggregate mean max attention] [--top-k-max 8 --adaptive spread|margin --spread 0.05
        --margin 0.25] [--tissue-min 0.2]
    (attention: a head fitted on the run's training slides, its threshold set on the run's validation slides,
    saved under <out>/smt_attention; the read knobs hold for every walk the selection compares)

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

Selection without peeking (issue 19): the walk (``--top-k`` x ``--aggregate``), each method's threshold and
the triage band are chosen on validation slides (``--val-set``: the ``val`` split of those dataset
overrides, at least ``--min-val-slides``, half with lesions), then the test slides (``--test-set``, another
``dataset.seed``) are walked once with that frozen choice: triage (SMT's uncertain slides to full tiling),
AUROC and balanced-accuracy differences against tiling (paired bootstrap), localisation (hit rate at the
lesion, FROC), and with ``--size-set itc micro macro`` a separate lesion-size set in CAMELYON's categories.

The measuring lives in ``patholite.slides.comparison_runs``, the results, records and report in
``patholite.slides.comparison``, the selection, triage, localisation and sizes in
``patholite.slides.smt_selection``, the statistics in ``patholite.measure.stats``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from patholite.artifacts.resolve import resolve_artifact
from patholite.errors import ConfigError, PatholiteError
from patholite.io import write_json
from patholite.models.smt import ADAPTIVE, READ_KEYS
from patholite.models.smt_aggregate import AGGREGATES, ATTENTION
from patholite.pipelines.tasks import task_for
from patholite.records import read_record
from patholite.slides.comparison import (
    SMT_NAME,
    check_disjoint,
    check_held_out,
    comparison_results,
    markdown,
    scaling_results,
    slide_scores,
    with_dataset_overrides,
    without_embeddings,
    write_records,
)
from patholite.slides.comparison_runs import compare_slides, mil_scores, scaling_rows, split_cases, tile_bags
from patholite.slides.inference import load_classifier
from patholite.slides.smt_inference import load_smt_model, smt_settings, with_attention_head
from patholite.slides.smt_selection import (
    Knobs,
    Selection,
    check_knobs,
    check_validation_set,
    localisation,
    select_then_test,
    selection_markdown,
    size_set_cases,
    size_set_spec,
    triage_results,
    validation_rows,
)


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
    parser.add_argument(
        "--top-k",
        type=int,
        nargs="+",
        help="Ks of the walk the validation slides choose from (default: as trained)",
    )
    parser.add_argument(
        "--aggregate",
        nargs="+",
        default=["mean", "max"],
        choices=AGGREGATES,
        help="slide scores to choose from; attention fits a head on the run's training slides "
        "(threshold on its validation slides) unless the SMT has one",
    )
    parser.add_argument("--attention-epochs", type=int, default=40)
    parser.add_argument("--top-k-max", type=int, help="adaptive reads: the most regions per image")
    parser.add_argument("--adaptive", choices=ADAPTIVE, help="none | spread | margin (default: as trained)")
    parser.add_argument("--spread", type=float, help="adaptive=spread: focusing scores this close read")
    parser.add_argument("--margin", type=float, help="adaptive=margin: the unsure band around 0.5")
    parser.add_argument("--tissue-min", type=float, help="candidate patches need this tissue fraction")
    parser.add_argument(
        "--val-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dataset overrides whose val split chooses the settings, e.g. dataset.seed=2 "
        "'dataset.slides_per_split=[2,48,2]' (default: the run's val split)",
    )
    parser.add_argument("--min-val-slides", type=int, default=48, help="refuse a smaller validation set")
    parser.add_argument(
        "--triage-gap", type=float, default=0.03, help="triage target: AUROC within this of tiling's"
    )
    parser.add_argument(
        "--triage-max-share", type=float, default=0.5, help="most slides triage may send to tiling"
    )
    parser.add_argument(
        "--size-set",
        nargs="*",
        default=[],
        metavar="CATEGORY",
        help="lesion-size categories of a separate slide set (itc micro macro)",
    )
    parser.add_argument("--size-slides", type=int, default=8, help="lesion slides per size category")
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
    # every knob is checked before any slide is read
    val_cfg = with_dataset_overrides(cfg, args.val_set) if args.val_set else cfg
    test_cfg = with_dataset_overrides(cfg, args.test_set) if args.test_set else cfg
    held_out = check_held_out(val_cfg, test_cfg)
    mpp = cfg.dataset.reader.mpp
    smt = load_smt_model(resolve_artifact(args.smt_run, SMT_NAME))
    reads = {key: getattr(args, key) for key in READ_KEYS}  # the slide CLI's smt.* too, for every walk
    smt_settings(*smt, args.smt_run, {**reads, "aggregate": None})  # a bad knob fails before any slide
    for key, value in reads.items():
        if value is not None:
            smt[1]["model"]["smt"][key] = value
    knobs = check_knobs(
        Knobs(tuple(args.top_k or [int(smt[1]["model"]["smt"]["top_k"])]), tuple(args.aggregate),
              args.triage_gap, args.triage_max_share, args.min_val_slides),
        int(smt[0].grid),
        AGGREGATES,
    )  # fmt: skip
    for k, a in knobs.walks():  # the slide CLI's own checks of smt.top_k / smt.aggregate
        smt_settings(*smt, args.smt_run, {"top_k": k, "aggregate": None if a == ATTENTION else a})
    planned = val_cfg.dataset.get("slides_per_split")  # a synthetic set's size is known before it is drawn
    if planned is not None and int(planned[1]) < knobs.min_val_slides:
        check_validation_set([i % 2 for i in range(int(planned[1]))], knobs.min_val_slides)
    size_spec = size_set_spec(cfg.dataset, args.size_set) if args.size_set else None
    if args.size_set and args.size_slides < 1:
        raise ConfigError(f"--size-slides {args.size_slides}: at least 1 lesion slide per category")
    tile = load_classifier(resolve_artifact(args.tile_run))
    dm = datamodule(cfg)
    if ATTENTION in knobs.aggregates and getattr(smt[0], "aggregator", None) is None:
        # fitted on the run's own training slides, its threshold on the run's validation slides: never on
        # the selection's validation set or the test set
        pairs = {s: [(c.path, c.label) for c in split_cases(dm, s)] for s in ("train", "val")}
        smt = with_attention_head(*smt, pairs["train"], pairs["val"], args.out / "smt_attention", mpp,
                                  args.attention_epochs)  # fmt: skip
    trained = smt[1]["model"]["smt"]
    val_cases = split_cases(datamodule(val_cfg) if args.val_set else dm, "val")
    check_validation_set([c.label for c in val_cases], knobs.min_val_slides)
    val_rows = validation_rows(val_cases, smt, tile, mpp, knobs)
    test_cases: list = []

    def test_rows(selection: Selection) -> list[dict]:
        # the test slides are listed (and written) only now, after the choice is frozen
        for key, value in (("top_k", selection.top_k), ("aggregate", selection.aggregate)):
            trained[key] = value
        test_cases.extend(split_cases(datamodule(test_cfg) if args.test_set else dm, "test"))
        check_disjoint(val_cases, test_cases)
        return compare_slides(test_cases, smt, tile, mpp)

    selection, test = select_then_test(val_rows, knobs, test_rows)
    scores = slide_scores(test)
    if args.mil_epochs > 0:  # 0: no MIL (it tiles every training slide again)
        train = split_cases(dm, "train")
        bags = tile_bags(train, tile, mpp, cache_dir=args.out / "cache")
        meta = {"class_names": list(dm.class_names), "tile_artifact": tile[1]}
        scores["mil_gated"] = mil_scores(
            bags, [c.label for c in train], test, args.mil_epochs, args.out, meta
        )
    results = comparison_results(test, scores, smt[1], tile[1], cfg.dataset.get("width"))
    results.update(
        selection=selection.as_dict(), held_out=held_out, triage=triage_results(test, selection),
        localisation=localisation(test, test_cases, selection), validation_slides=val_rows,
    )  # fmt: skip
    if size_spec is not None:
        cases = size_set_cases(args.out / "size_slides", size_spec, args.size_set, args.size_slides)
        rows = compare_slides(cases, smt, tile, mpp, methods=("smt", "tiling"))
        results["lesion_size"] = localisation(rows, cases, selection)
        results["lesion_size"]["slides"] = [without_embeddings(r) for r in rows]
    if args.sizes:
        rows = scaling_rows(
            cfg.dataset, smt, tile, args.sizes, args.scale_slides, mpp, args.out / "scaling_slides"
        )
        results.update(scaling_results(rows, args.sizes))
    write_json(args.out / "results.json", results)
    text = markdown(results) + selection_markdown(results)
    (args.out / "results.md").write_text(text)
    walk = {"top_k": selection.top_k, "aggregate": selection.aggregate, **reads}
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
