"""Real 4-bit weights on DeiT-Tiny: file size, speed and parity of ONNX Runtime INT4 (MatMulNBits) and mixed
INT4/INT8/FP32 artifacts against FP32 and ORT dynamic INT8, in one process.

    python scripts/bench_int4.py --out <dir> [--trained <float DeiT-Tiny artifact folder>]

1. With ``--trained`` (a float artifact, e.g. a ``model=deit_tiny`` run's ``artifacts/fp32`` or its cache
   entry): the mixed plan (``mixed_precision_plan(int4=True)``, the ptq stage's ``mixed_int4``) is made on
   ``--plan-images`` synthetic validation tiles at that artifact's size and classes, and every variant's
   parity against FP32 (top-1 flips, max |logit difference|, accuracy) is measured on ``--test-images``
   other synthetic tiles. Without it, parity is on random weights and random inputs, where logits are
   near-equal and flips mean little; the mixed variant then uses a fixed illustrative mix.
2. Size and speed at DeiT-Tiny 224 px, 7 classes (seeded random weights; speed does not depend on them):
   FP32 ONNX, ORT dynamic INT8, all-INT4 (asymmetric and symmetric) and the plan's mix, each file's size
   against the FP32 file; throughput against torch FP32 eager at batch 1 and 8, ``--threads`` threads,
   variants alternating within each repeat (this machine is shared and drifts). The CPU features are
   recorded with the figures.

Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from patholite.accelerators.machine import describe_machine
from patholite.artifacts.load import load_artifact
from patholite.artifacts.onnx import ONNX_FILE, OrtModule, save_onnx_artifact
from patholite.compress.int4 import linear_onnx_nodes
from patholite.compress.quantize import mixed_precision_plan
from patholite.data.synthetic.tiles import generate_split
from patholite.io import write_json
from patholite.models.factory import create_network
from patholite.pipelines.stages.ptq import save_dynamic_ort, save_mixed_int4

DEIT = {"name": "deit_tiny", "timm_name": "deit_tiny_patch16_224", "family": "vit", "kwargs": {}}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trained", type=Path, default=None, help="a float DeiT-Tiny artifact folder")
    parser.add_argument("--plan-images", type=int, default=64)
    parser.add_argument("--test-images", type=int, default=256)
    parser.add_argument("--budget-pp", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--iterations", type=int, default=20, help="timed calls per variant, batch and repeat"
    )
    return parser.parse_args(argv)


def tiles(n: int, size: int, mean, std, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic H&E-like tiles (4 classes), resized and normalised as the eval transform does."""
    images, labels = generate_split(-(-n // 4), 96, 0.5, seed)
    x = torch.from_numpy(images[:n]).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x, torch.from_numpy(labels[:n])


def parity(modules: dict, x: torch.Tensor, y: torch.Tensor | None) -> dict:
    """Each module's top-1 flips and max |logit diff| against the first, and accuracy when labels exist."""
    outs = {}
    with torch.no_grad():
        for name, m in modules.items():
            outs[name] = torch.cat([m(b) for b in x.split(32)])
    ref = next(iter(outs.values()))
    rows = {}
    for name, out in outs.items():
        rows[name] = {
            "flip_rate": float((out.argmax(1) != ref.argmax(1)).float().mean()),
            "max_abs_logit_diff": float((out - ref).abs().max()),
            "logit_std": float(ref.std()),
        }
        if y is not None:
            rows[name]["accuracy"] = float((out.argmax(1) == y).float().mean())
    return rows


def timed(modules: dict, size: int, repeats: int, iterations: int) -> dict:
    """Latency per call at batch 1 and 8, variants alternating inside each repeat; ratios to the first."""
    result = {}
    for batch in (1, 8):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        per = {name: [] for name in modules}
        with torch.no_grad():
            for m in modules.values():  # warm-up
                for _ in range(3):
                    m(x)
            for r in range(repeats):
                order = list(modules) if r % 2 == 0 else list(reversed(modules))
                for name in order:
                    n = iterations if batch == 1 else max(iterations // 4, 3)
                    start = time.perf_counter()
                    for _ in range(n):
                        modules[name](x)
                    per[name].append((time.perf_counter() - start) / n)
        base = per[next(iter(modules))]
        result[batch] = {
            name: {
                "ms": 1000 * statistics.median(v),
                "throughput_x": statistics.median(b / t for b, t in zip(base, v, strict=True)),
                "throughput_x_range": [
                    min(b / t for b, t in zip(base, v, strict=True)),
                    max(b / t for b, t in zip(base, v, strict=True)),
                ],
            }  # fmt: skip
            for name, v in per.items()
        }
    return result


def build(net, directory: Path, meta: dict, mix: dict | None) -> dict[str, Path]:
    """FP32 ONNX (exported once), ORT dynamic INT8, all-INT4 (asymmetric, symmetric) and ``mix``."""
    fp32 = directory / "onnx_fp32" / ONNX_FILE
    if not fp32.is_file():
        save_onnx_artifact(net, directory / "onnx_fp32", meta)
    save_dynamic_ort(fp32, directory / "int8_dynamic_ort", meta)
    save_mixed_int4(net, fp32, directory / "int4_ort", meta)
    save_mixed_int4(net, fp32, directory / "int4_ort_symmetric", meta, symmetric=True)
    dirs = {n: directory / n for n in ("onnx_fp32", "int8_dynamic_ort", "int4_ort", "int4_ort_symmetric")}
    if mix is not None:
        save_mixed_int4(net, fp32, directory / "int4_mixed_ort", meta, mix)
        dirs["int4_mixed_ort"] = directory / "int4_mixed_ort"
    return dirs


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": describe_machine(), "threads": args.threads}

    # ---- 1. the plan and parity on a trained model (or random weights)
    mix = None
    if args.trained is not None:
        net, meta = load_artifact(args.trained)
        net = net.eval()
        size, mean, std = meta["image_size"], meta["mean"], meta["std"]
        xv, yv = tiles(args.plan_images, size, mean, std, seed=1)
        xt, yt = tiles(args.test_images, size, mean, std, seed=2)
        work = args.out / "trained"
        meta = {k: v for k, v in meta.items() if k not in ("kind", "weights")}
        save_onnx_artifact(net, work / "onnx_fp32", meta)
        nodes = linear_onnx_nodes(net, work / "onnx_fp32" / ONNX_FILE)
        start = time.perf_counter()
        plan = mixed_precision_plan(
            net, list(zip(xv.split(32), yv.split(32), strict=True)), budget_pp=args.budget_pp,
            layers=[n for n, w in nodes.items() if w.quantizable], int4=True,
        )  # fmt: skip
        plan_s = time.perf_counter() - start
        mix = plan["layer_bits"]
        dirs = build(net, work, meta, mix)
        modules = {"torch_fp32": net, **{n: OrtModule(d / ONNX_FILE, args.threads) for n, d in dirs.items()}}
        results["plan"] = {
            "images": plan["images"], "budget_pp": plan["budget_pp"], "seconds": plan_s,
            "accuracy_drop_pp": plan["accuracy_drop_pp"], "float_accuracy": plan["float_accuracy"],
            "layers": {b: sum(v == b for v in mix.values()) for b in (4, 8, 32)}, "layer_bits": mix,
        }  # fmt: skip
        results["parity"] = {
            "inputs": f"{args.test_images} synthetic tiles ({size} px), trained weights from {args.trained}",
            "rows": parity(modules, xt, yt),
        }
    else:
        inputs = "64 random inputs, random weights (224 px): logits near-equal, flips mean little"
        results["parity"] = {"inputs": inputs, "rows": None}

    # ---- 2. size and speed at 224 px, 7 classes
    torch.manual_seed(0)
    deit = create_network(DEIT, 7, 224).eval()
    if mix is None:  # illustrative: the MLP's second layer of the first two blocks at INT8, the rest INT4
        mix = {n: 4 for n, m in deit.named_modules() if isinstance(m, torch.nn.Linear)}
        mix.update({"blocks.0.mlp.fc2": 8, "blocks.1.mlp.fc2": 8, "head": 32})
    meta224 = {"image_size": 224, "class_names": [f"c{i}" for i in range(7)], "model": DEIT}
    dirs = build(deit, args.out / "deit_tiny_224", meta224, mix)
    fp32_bytes = (dirs["onnx_fp32"] / ONNX_FILE).stat().st_size
    results["size"] = {
        n: {"bytes": (d / ONNX_FILE).stat().st_size, "of_fp32": (d / ONNX_FILE).stat().st_size / fp32_bytes}
        for n, d in dirs.items()
    }
    if args.trained is None:
        results["parity"]["rows"] = parity(
            {"torch_fp32": deit, **{n: OrtModule(d / ONNX_FILE, args.threads) for n, d in dirs.items()}},
            torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(2)),
            None,
        )
    modules = {"torch_fp32": deit, **{n: OrtModule(d / ONNX_FILE, args.threads) for n, d in dirs.items()}}
    results["speed"] = timed(modules, 224, args.repeats, args.iterations)
    write_json(args.out / "results.json", results)
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"Machine: {m.get('machine_label')}, torch {m.get('torch_cpu_capability')}, {r['threads']} threads; "
        f"CPU features: {json.dumps(m.get('cpu_features'))}",
        "",
        "| variant | file (MB) | x FP32 file | b1 ms | b1 x torch FP32 | b8 ms | b8 x torch FP32 [range] |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in r["speed"][1]:
        size = r["size"].get(name, {})
        s1, s8 = r["speed"][1][name], r["speed"][8][name]
        lo, hi = s8["throughput_x_range"]
        lines.append(
            f"| {name} | {size.get('bytes', float('nan')) / 1e6:.2f} | "
            f"{size.get('of_fp32', float('nan')):.3f} | "
            f"{s1['ms']:.1f} | {s1['throughput_x']:.2f} | {s8['ms']:.1f} | {s8['throughput_x']:.2f} "
            f"[{lo:.2f}-{hi:.2f}] |"
        )
    if "plan" in r:
        p = r["plan"]
        lines += [
            "",
            f"Plan: {p['layers']} (bits -> layers) on {p['images']} validation tiles, "
            f"budget {p['budget_pp']} pp, "
            f"planned drop {p['accuracy_drop_pp']:.2f} pp, {p['seconds']:.0f} s",
        ]
    lines += ["", f"Parity against torch FP32 ({r['parity']['inputs']}):", ""]
    lines += [
        "| variant | flip rate | max abs logit diff | logit std | accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in (r["parity"]["rows"] or {}).items():
        acc = row.get("accuracy")
        lines.append(
            f"| {name} | {row['flip_rate']:.4f} | {row['max_abs_logit_diff']:.4f} | {row['logit_std']:.3f} | "
            f"{'-' if acc is None else f'{100 * acc:.2f}%'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
