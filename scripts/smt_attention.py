"""Fit SMT's attention aggregation on a trained SMT run, without retraining SMT (issue 19).

    python scripts/smt_attention.py --smt-run <model=smt run> --out <artifact dir> [--epochs 40]

Walks the run's training slides with its float SMT (``smt_fp32``), trains a gated-attention head on the
last layer's embeddings and the slide labels, sets its threshold on the run's validation slides (never the
test slides), and writes a float SMT artifact with the head to ``--out`` (sidecar
``model.smt.aggregate: attention`` and ``smt_attention``: slides, losses, threshold). Use it as any SMT
artifact: ``python -m patholite.slide artifact=<out> slides=...``. The logic is
``patholite.slides.smt_inference.with_attention_head``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from patholite.artifacts.resolve import resolve_artifact
from patholite.errors import PatholiteError
from patholite.pipelines.tasks import task_for
from patholite.records import read_record
from patholite.slides.comparison import SMT_NAME
from patholite.slides.comparison_runs import split_cases
from patholite.slides.smt_inference import load_smt_model, with_attention_head


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    cfg = OmegaConf.create(read_record(args.smt_run / "metrics.json")["config"])
    net, meta = load_smt_model(resolve_artifact(args.smt_run, SMT_NAME))
    dm = task_for(cfg.model).datamodule(cfg, pin_memory=False)
    dm.setup("fit")
    pairs = {s: [(c.path, c.label) for c in split_cases(dm, s)] for s in ("train", "val")}
    _, meta = with_attention_head(net, meta, pairs["train"], pairs["val"], args.out, cfg.dataset.reader.mpp,
                                  args.epochs, int(cfg.get("seed") or 0))  # fmt: skip
    return meta["smt_attention"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smt-run", type=Path, required=True, help="a finished model=smt run folder")
    parser.add_argument("--out", type=Path, required=True, help="the new artifact's folder")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        print(json.dumps(run(args), indent=2))
    except PatholiteError as err:
        raise SystemExit(f"smt_attention: {err}") from err


if __name__ == "__main__":
    main()
