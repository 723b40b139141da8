"""Issue 16's targets for label-free feature distillation, measured through patholite's own entry points.

Quality (``quality``): a teacher trained with labels on synthetic tiles generated from another seed
(``dataset.seed=1``) than the tiles the student distils on and the probes judge (``dataset.seed=0``); then
- a label-free student of the teacher (``compression=feature_kd_ptq``): linear-probe balanced accuracy of
  teacher, student and INT8 student (95% bootstrap CIs), and INT8's change of probe accuracy;
- the same student probed with 10% of the train labels, against a student of the same architecture trained
  from scratch on those 10% (``dataset.train_per_class`` cut to a tenth);
- a second teacher of another architecture, a student of it alone, and a student of both teachers.
Speed (``speed``): teacher and student encoders (random weights, headless) and the student's INT8 forms,
timed together in one child process, alternating (patholite's protocol), at ``--speed-size`` px.

    python scripts/bench_feature_kd.py --out bench-fkd                      # the issue's protocol (hours)
    python scripts/bench_feature_kd.py --out bench-fkd --teacher vit_mini --teacher2 resnet18 \\
        --student vit_nano --image-size 64 --epochs 6 --kd-epochs 6            # a reduced run (minutes)

Writes ``<out>/results.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from patholite.artifacts.onnx import save_onnx_artifact
from patholite.artifacts.torch_float import save_float_artifact
from patholite.config.options import load_model_option
from patholite.config.schema import BenchConfig
from patholite.data.synthetic.slides import generate_slides
from patholite.data.synthetic.spec import SlideSpec
from patholite.measure.timing import time_artifacts
from patholite.models.encoder import embed_dim
from patholite.models.factory import create_network
from patholite.pipelines.stages.ptq import save_dynamic, save_dynamic_ort
from patholite.records import read_record
from patholite.slides.features import mil_on_features

QUIET = ["logger=csv", "callbacks.progress_bar=none", "bench.isolation=process", "bench.warmup=1"]
QUIET += ["bench.iters=2", "bench.repeats=1", "bench.batch_sizes=[8]"]


def train(
    out: Path, name: str, args: argparse.Namespace, overrides: list[str], epochs: int | None = None
) -> dict[str, Any]:
    """One ``python -m patholite.train`` run (reused when its record says ok); its record."""
    run_dir = out / name
    if (run_dir / "metrics.json").is_file() and read_record(run_dir).get("status") == "ok":
        return read_record(run_dir)
    common = [
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={out / 'cache'}",
        f"dataset.image_size={args.image_size}",
        f"trainer.max_epochs={epochs or args.epochs}",
        f"seed={args.seed}",
    ]
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "patholite.train", *QUIET, *common, *overrides], text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}); see {run_dir}")
    print(f"{name}: {time.time() - started:.0f} s", flush=True)
    return read_record(run_dir)


def rows(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in record["artifacts"]}


def probe(row: dict[str, Any]) -> dict[str, Any]:
    q = row["quality"]
    linear = q.get("probe", {}).get("linear", {})
    return {
        "balanced_accuracy": q["balanced_accuracy"],
        "balanced_accuracy_ci95": linear.get("balanced_accuracy_ci95") or q.get("balanced_accuracy_ci95"),
        "knn_balanced_accuracy": q.get("probe", {}).get("knn", {}).get("balanced_accuracy"),
        "stain_cosine": q.get("stain_cosine"),
        "params": row["cost"]["params"],
    }


def quality(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    teacher_data = ["dataset.seed=1", "compression=none"]
    t1 = train(out, "teacher", args, [f"model={args.teacher}", *teacher_data])
    t2 = train(out, "teacher2", args, [f"model={args.teacher2}", *teacher_data])
    kd = [f"model={args.student}", f"compression.feature_kd.epochs={args.kd_epochs}"]
    kd += [f"compression.feature_kd.tiles.max_tiles={args.tiles}"] if args.tiles else []
    single = train(
        out,
        "student",
        args,
        [*kd, "compression=feature_kd_ptq", f"compression.teacher.checkpoint={out / 'teacher'}"],
    )
    few = train(
        out,
        "student_10pct_labels",
        args,
        [*kd, "compression=feature_kd", f"compression.teacher.checkpoint={out / 'teacher'}"]
        + [f"probe.label_fraction={args.label_fraction}"],
    )
    per_class = max(1, round(400 * args.label_fraction))
    scratch = train(
        out,
        "scratch_10pct_labels",
        args,
        [f"model={args.student}", "compression=none", f"dataset.train_per_class={per_class}"],
        epochs=args.scratch_epochs,
    )
    alone2 = train(
        out,
        "student_of_teacher2",
        args,
        [*kd, "compression=feature_kd", f"compression.teacher.checkpoint={out / 'teacher2'}"],
    )
    both = train(
        out,
        "student_of_both",
        args,
        [
            *kd,
            "compression=feature_kd",
            f"compression.feature_kd.teachers=[{out / 'teacher'},{out / 'teacher2'}]",
        ],
    )
    s = rows(single)
    result = {
        "teacher_trained": {"classifier_balanced_accuracy": rows(t1)["fp32"]["quality"]["balanced_accuracy"]},
        "teacher_probe": probe(s["teacher_fp32"]),
        "student_probe": probe(s["student_fp32"]),
        "int8": {
            name: {**probe(s[name]), "parity": s[name]["parity"]} for name in s if name.startswith("int8")
        },
        "student_parity_vs_teacher": s["student_fp32"]["parity"],
        "labels_10pct": {
            "student_probe": probe(rows(few)["student_fp32"]),
            "scratch_classifier": {
                "balanced_accuracy": rows(scratch)["fp32"]["quality"]["balanced_accuracy"],
                "accuracy_ci95": rows(scratch)["fp32"]["quality"]["accuracy_ci95"],
            },
        },
        "multi_teacher": {
            "teacher2_probe": probe(rows(alone2)["teacher_fp32"]),
            "student_of_teacher1": probe(s["student_fp32"]),
            "student_of_teacher2": probe(rows(alone2)["student_fp32"]),
            "student_of_both": probe(rows(both)["student_fp32"]),
            "teacher2_classifier_balanced_accuracy": rows(t2)["fp32"]["quality"]["balanced_accuracy"],
        },
    }
    result["student_minus_teacher_pp"] = 100 * (
        result["student_probe"]["balanced_accuracy"] - result["teacher_probe"]["balanced_accuracy"]
    )
    return result


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """Headless teacher and student (random weights) and the student's INT8 forms at ``--speed-size`` px,
    timed together in one child, alternating."""
    size = args.speed_size
    work = Path(tempfile.mkdtemp(prefix="fkd-speed-"))
    dirs = {}
    for role, option in (("teacher_fp32", args.speed_teacher), ("student_fp32", args.speed_student)):
        cfg = OmegaConf.to_container(load_model_option(option), resolve=True)
        net = create_network(cfg, 0, size).eval()
        meta = {
            "model": cfg,
            "class_names": ["a", "b"],
            "image_size": size,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "encoder": {"embed_dim": embed_dim(net, size)},
        }
        save_float_artifact(net, work / role, meta)
        dirs[role] = work / role
        if role == "student_fp32":
            save_dynamic(net, work / "student_int8_torch", meta, args.engine)
            save_onnx_artifact(net, work / "student_onnx_fp32", meta)
            save_dynamic_ort(work / "student_onnx_fp32" / "model.onnx", work / "student_int8_ort", meta)
            dirs.update({k: work / k for k in ("student_int8_torch", "student_int8_ort")})
    bench = OmegaConf.structured(
        BenchConfig(warmup=5, iters=args.iters, repeats=args.repeats, batch_sizes=[8], threads=None)
    )
    timing = time_artifacts(list(dirs.values()), size, bench, "cpu")
    out = {"image_size": size, "batch": 8, "threads": timing["threads"], "artifacts": {}}
    base = timing["artifacts"]["teacher_fp32"]["throughput_ips"]["8"]
    for name in dirs:
        t = timing["artifacts"][name]
        out["artifacts"][name] = {
            "throughput_ips": t["throughput_ips"]["8"],
            "x_teacher_fp32": t["throughput_ips"]["8"] / base,
            "ratio_to_first": (t.get("ratio_to_baseline") or {}).get("8"),
        }
    return out


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def features(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Cohort feature extraction through ``python -m patholite.slide mode=features`` on synthetic slides
    (half with lesions) by the teacher and the student's float and INT8 forms; tiles per second of each;
    MIL trained on the even slides' features, scored on the odd ones; paired bootstrap of the AUROC change."""
    folder = out / "slides"
    spec = SlideSpec(width=args.slide_px, height=args.slide_px)
    slides = generate_slides(folder, args.slides, spec, seed=args.seed, normal_share=0.5)
    labels = {s.path.stem: int(bool(s.lesions)) for s in slides}
    artifacts = {
        "teacher_fp32": out / "student" / "artifacts" / "teacher_fp32",
        "student_fp32": out / "student" / "artifacts" / "student_fp32",
        "int8_dynamic": out / "student" / "artifacts" / "int8_dynamic",
        "int8_dynamic_ort": out / "student" / "artifacts" / "int8_dynamic_ort",
    }
    result: dict[str, Any] = {"slides": len(slides), "lesion_slides": sum(labels.values()), "artifacts": {}}
    # a first pass fills the per-slide tissue and grid cache, so no timed artifact pays for it
    for name, artifact in [("warmup", artifacts["int8_dynamic_ort"]), *artifacts.items()]:
        run_dir = out / "features" / name
        if not (run_dir / "summary.csv").is_file():
            command = [sys.executable, "-m", "patholite.slide", "mode=features", f"artifact={artifact}"]
            command += [f"slides={folder}", f"hydra.run.dir={run_dir}", "logger=csv"]
            done = subprocess.run(command, text=True)
            if done.returncode != 0:
                raise SystemExit(f"feature extraction with {name} failed; see {run_dir}")
        if name == "warmup":
            continue
        reports = [json.loads(p.read_text()) for p in sorted(run_dir.glob("*/report.json"))]
        tiles = sum(int(r["n_tiles"]) for r in reports)
        stream = sum(int(r["n_tiles"]) / float(r["tiles_per_s"]) for r in reports if r.get("tiles_per_s"))
        total = sum(float(r["seconds"]) for r in reports)
        h5 = {p.parent.name: p for p in run_dir.glob("*/features.h5")}
        stems = sorted(h5)
        train = [(h5[s], labels[s]) for i, s in enumerate(stems) if i % 2 == 0]
        test = [(h5[s], labels[s]) for i, s in enumerate(stems) if i % 2 == 1]
        mil = mil_on_features(train, test, epochs=args.mil_epochs, seed=args.seed)
        result["artifacts"][name] = {
            "tiles": tiles,
            "tiles_per_s_stream": tiles / stream if stream else None,
            "tiles_per_s_end_to_end": tiles / total if total else None,
            "mil_auroc": mil["auroc"],
            "test_labels": [r["label"] for r in mil["slides"]],
            "test_scores": [r["score"] for r in mil["slides"]],
        }
    base = result["artifacts"]["teacher_fp32"]
    for row in result["artifacts"].values():
        row["speed_x_teacher_end_to_end"] = row["tiles_per_s_end_to_end"] / base["tiles_per_s_end_to_end"]
        y, t, s = np.array(base["test_labels"]), np.array(base["test_scores"]), np.array(row["test_scores"])
        rng = np.random.default_rng(args.seed)
        diffs = []
        for _ in range(1000):
            idx = rng.integers(0, len(y), len(y))
            if len(set(y[idx].tolist())) == 2:
                diffs.append(auroc(y[idx], s[idx]) - auroc(y[idx], t[idx]))
        row["mil_auroc_change_pp"] = 100 * (row["mil_auroc"] - base["mil_auroc"])
        row["mil_auroc_change_ci95_pp"] = [float(100 * np.percentile(diffs, q)) for q in (2.5, 97.5)]
    return result


def cpu() -> dict[str, Any]:
    flags = ""
    with contextlib.suppress(OSError, StopIteration):
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return {
        "machine": platform.processor() or platform.machine(),
        "features": [f for f in wanted if f in flags.split()],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher", default="deit_small")
    p.add_argument("--teacher2", default="resnet18")
    p.add_argument("--student", default="deit_tiny")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--epochs", type=int, default=30, help="teacher and scratch training epochs")
    p.add_argument("--kd-epochs", type=int, default=30)
    p.add_argument("--tiles", type=int, default=0, help="unlabelled tiles (0: the whole train split)")
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--speed-teacher", default="deit_small")
    p.add_argument("--speed-student", default="deit_tiny")
    p.add_argument("--speed-size", type=int, default=224)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--engine", default="x86")
    p.add_argument("--scratch-epochs", type=int, default=60, help="the 10%-label student from scratch")
    p.add_argument("--slides", type=int, default=48, help="synthetic slides for feature extraction")
    p.add_argument("--slide-px", type=int, default=4096)
    p.add_argument("--mil-epochs", type=int, default=30)
    p.add_argument("--skip", choices=("quality", "speed", "features"), action="append", default=[])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"cpu": cpu(), "args": {k: str(v) for k, v in vars(args).items()}}
    if "speed" not in args.skip:
        results["speed"] = speed(args)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    if "quality" not in args.skip:
        results["quality"] = quality(args.out, args)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    if "features" not in args.skip:
        results["features"] = features(args.out, args)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
