"""Benchmark of cohort sharding (issue 17): slides/hour with 1, 2 and 4 local shards of the real slide CLI
(submitit_local, one thread each), their merged summaries compared, a shard SIGKILLed and rerun, and the
estimate of 10,000 slides of 40x from the measured per-tile costs. The logic is in
``patholite.slides.cohort_bench``; slides and artifacts come from ``scripts/bench_slides.py``'s helpers.

    PYTHONPATH=$PWD/src .venv/bin/python scripts/bench_cohort.py --out outputs/bench-cohort \
        [--slides 12] [--slide-px 16384] [--repeats 3] [--shards 1,2,4] [--artifact <artifact folder>]

Writes ``<out>/report.json`` (every number) and ``<out>/results.md`` (the docs/RESULTS.md section).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_slides import make_artifact, make_slide

from patholite.artifacts.sidecar import read_sidecar
from patholite.slides import cohort_bench as cb
from patholite.slides.cohort import available_cores

SRC = Path(__file__).resolve().parents[1] / "src"


def train_artifact(out: Path, env: dict) -> Path:
    """A tiny trained vit_micro (``debug=fast``), trained once into ``out/train``."""
    artifact = out / "train" / "artifacts" / "fp32"
    if not artifact.is_dir():
        cmd = [sys.executable, "-m", "patholite.train", "debug=fast", "model=vit_micro", "logger=none",
               f"hydra.run.dir={out / 'train'}"]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True)
    return artifact


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/bench-cohort"))
    p.add_argument("--slides", type=int, default=12)
    p.add_argument("--slide-px", type=int, default=16384, help="side of each synthetic slide (0.5 um/px)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shards", default="1,2,4", help="shard counts, comma-separated (1 is the baseline)")
    p.add_argument("--artifact", type=Path, help="default: train a tiny vit_micro once")
    p.add_argument("--kill-after", type=int, default=4, help="complete slides before the SIGKILL")
    p.add_argument("--cores-per-node", type=int, default=32)
    p.add_argument("--nodes", default="1,4,16,64")
    p.add_argument(
        "--reference-model", default="deit_small", help="a second geometry for the estimate ('' none)"
    )
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = cb.pinned_env(1, src=SRC)
    shard_counts = [int(v) for v in args.shards.split(",")]
    if 1 not in shard_counts:
        raise SystemExit("--shards must include 1: the ratios are to one shard")

    slides = out / "slides"
    for seed in range(1, args.slides + 1):
        make_slide(slides, args.slide_px, seed=seed)
    paths = sorted(slides.glob("*.svs"))
    if len(paths) != args.slides:
        raise SystemExit(
            f"{slides} holds {len(paths)} slides, not --slides {args.slides}; give a fresh --out"
        )
    artifact = (args.artifact or train_artifact(out, env)).resolve()

    runs: dict[int, list[cb.CohortRun]] = {n: [] for n in shard_counts}
    for rep in range(args.repeats):
        for n in cb.rotation(shard_counts, rep):
            work = out / "runs" / f"r{rep}-shards{n}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            run = cb.run_cohort(slides, artifact, work, n, env)
            runs[n].append(run)
            print(f"repeat {rep}, {n} shards: {run.wall_s:.1f} s, {run.slides_per_hour:.0f} slides/h, "
                  f"slowest shard's slides {max(run.shard_slide_s):.1f} s", flush=True)  # fmt: skip
    scaling = cb.scaling_summary(runs, available_cores())

    kill_work = out / "runs" / "kill"
    shutil.rmtree(kill_work, ignore_errors=True)
    kill_work.mkdir(parents=True)
    kill = cb.kill_and_rerun(slides, artifact, kill_work, env, len(paths), args.kill_after)
    print(json.dumps({"kill_rerun": kill}, indent=2), flush=True)
    summaries = {f"{n} shard{'s' * (n > 1)}": runs[n][0].summary for n in shard_counts}
    summaries["killed + rerun"] = kill["summary"]
    compared = cb.compare_summaries(summaries)

    # per-tile costs: the CLI's own timings (1-shard runs), the model's INT8/float ratio in this process
    costs = [cb.report_costs(Path(r.summary).parent, r.jobs[0]["slide_walls"]) for r in runs[1]]
    cli = {k: statistics.median(c[k] for c in costs) for k in costs[0]}
    startup = statistics.median(r.overhead_s for r in runs[1])
    sidecar = read_sidecar(artifact)
    tile_um = float(sidecar["tile_size"]) * float(sidecar["mpp"])
    inproc = cb.model_costs(artifact)
    measured = cb.read_costs(paths[0], tile_um, float(sidecar["mpp"]), int(sidecar["image_size"]), tiles=50)
    assumptions = cb.CohortAssumptions(
        cores_per_node=args.cores_per_node, nodes=tuple(int(v) for v in args.nodes.split(","))
    )
    model = cli["model_s_per_tile"]
    bench_costs = cb.ModelCosts(
        name=f"{sidecar['model']['name']} (benchmark artifact)", tile_um=tile_um, mpp=float(sidecar["mpp"]),
        read_s_per_tile=cli["read_s_per_tile"], measured_decoded_side=measured["decoded_side"],
        model_s_per_tile={"float": model, "int8": model * inproc["int8"] / inproc["float"]},
        outputs_s_per_tile=cli["outputs_s_per_tile"], tissue_s_per_slide=cli["tissue_s_per_slide"],
        startup_s=startup,
    )  # fmt: skip
    estimates = [{**cb.estimate_cohort(bench_costs, assumptions), "source": "the CLI's reports; INT8 = float "
                  f"x {inproc['int8'] / inproc['float']:.2f}, the in-process INT8/float ratio"}]  # fmt: skip
    if args.reference_model:
        ref = make_artifact(out, args.reference_model, 224, 224, 0.5)
        ref_model = cb.model_costs(ref, batch=8, repeats=3)
        ref_read = cb.read_costs(paths[0], 112.0, 0.5, 224, tiles=100)
        ref_costs = cb.ModelCosts(
            name=f"{args.reference_model} 224 px at 0.5 um/px", tile_um=112.0, mpp=0.5,
            read_s_per_tile=ref_read["read_s_per_tile"], measured_decoded_side=ref_read["decoded_side"],
            model_s_per_tile=ref_model, outputs_s_per_tile=cli["outputs_s_per_tile"],
            tissue_s_per_slide=cli["tissue_s_per_slide"], startup_s=startup,
        )  # fmt: skip
        source = "in-process reading (SlideTiles) and model (random weights); outputs, tissue: the CLI's"
        estimates.append({**cb.estimate_cohort(ref_costs, assumptions), "source": source})

    report = {
        "date": dt.date.today().isoformat(),
        "cpu": cb.cpu_description(),
        "setup": {
            "command": "python scripts/bench_cohort.py " + shlex.join(sys.argv[1:]),
            "slides": len(paths),
            "slide_px": args.slide_px,
            "repeats": args.repeats,
            "shards": shard_counts,
            "artifact": str(artifact),
            "artifact_desc": f"{sidecar['model']['name']} ({sidecar['image_size']} px input, "
            f"{tile_um:.0f} um tiles at {float(sidecar['mpp']):.3g} um/px"
            + (", trained with `debug=fast`)" if args.artifact is None else ")"),
            "thread_vars": list(cb.THREAD_VARS),
            "pythonpath": env["PYTHONPATH"],
            "seconds": round(time.perf_counter() - START, 1),
        },  # fmt: skip
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "scaling": scaling,
        "runs": {n: [{**vars(r), "breakdown": r.breakdown()} for r in rs] for n, rs in runs.items()},
        "summaries": compared,
        "kill_rerun": kill,
        "costs": {"cli_reports": cli, "in_process_model": inproc, "in_process_read": measured},
        "estimates": estimates,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = cb.results_markdown(report)
    (out / "results.md").write_text(markdown)
    print(markdown)


START = time.perf_counter()

if __name__ == "__main__":
    main()
